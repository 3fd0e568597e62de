"""The data layer: REACT layout, media decoding, feature extractors, the extraction job, the
feature snapshot (the contract every later stage reads) and synthetic REACT-layout data."""
