# MLflow tracking server for infra/k8s/mlflow.yaml: MLflow (same version as the clients,
# constraints.txt), the Postgres driver and boto3 for the S3 artifact store.
#
#   docker build -f infra/docker/mlflow.Dockerfile -t ghcr.io/reactdiff/mlflow-server:3.17.2 infra/docker
FROM python:3.11.14-slim

RUN pip install --no-cache-dir \
      mlflow==3.17.2 \
      psycopg2-binary==2.9.13 \
      boto3==1.43.117 \
 && useradd --uid 1000 --create-home mlflow

USER 1000
WORKDIR /home/mlflow
ENV MLFLOW_DISABLE_TELEMETRY=true
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--help"]
