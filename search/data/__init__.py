"""The data layer: the data set index, decoding, the on-disk cache, batches, demo sets."""
