"""Everything distributed or stateful: storage, REACT data, extraction, training, tracking.

Importing this package changes nothing in the process environment (no proxies, no Ray
settings): local Ray gets its loopback settings in ``pipeline.runtime.init_ray`` only.
"""
