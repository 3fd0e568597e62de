"""What the test suites share, imported as ``tests.helpers.<module>`` (never copied between suites):

media      tiny videos, frame folders and audio (PyAV, soundfile, Pillow); dataset copies
models     the tiny generator and the feature extractors' tiny networks
snapshots  a tiny feature snapshot written in the reader's format
training   sizes and ``--set`` overrides of a tiny 2-worker training run
ray_nodes  real `ray start` nodes, each in its own session
faults     the reliability suite's fault injectors and process helpers
shell      the pipeline run from a clean user shell against far (127.0.0.2) servers
report     what the reliability suite tried, printed at the end of the run
"""
