"""MLflow: runs and their artifacts, the model registry, the pyfunc flavour, and promotion."""
