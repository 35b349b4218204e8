"""The data contracts every stream loader and strategy shares: the dataset, missing-modality
patterns, the missing-case stream, packing, standardisation and the stream catalog."""
