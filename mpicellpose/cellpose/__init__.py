"""The adapter to Cellpose: the segmentation backends, which weights a run uses, Cellpose 3 and
4 specifics, the network's arithmetic, the flow and mask steps against Cellpose's own code, one
device per rank, and the shipped models.

``import cellpose`` inside this package is the real Cellpose (absolute imports); it is imported
lazily, inside the functions, never at module level.
"""
