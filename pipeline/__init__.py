"""Everything distributed or stateful: storage, REACT data, extraction, training, tracking."""
