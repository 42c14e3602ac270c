"""Pure geometry of a run: the block grid, the flow boxes, contiguous splits, the
hand-out order, what the network costs, and stitching arithmetic.

No MPI, no I/O, no Cellpose: functions of shapes, blocks and arrays only.
"""
