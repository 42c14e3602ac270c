"""The phases of a run, in the order a block travels through them.

========================  ==========================================================
:mod:`.plan`              rank 0 checks everything and decides the grid -> ``Plan``
:mod:`.normalize`         global intensity bounds, sampled by every rank (phase 1b)
:mod:`.flows`             ``--pipeline flows``: the network per flow box, its shell to
                          the work directory and masks per box in :mod:`.boxmasks` (instead of segment)
:mod:`.segment`           every rank segments its blocks -> records + scratch chunks
:mod:`.faces`             neighbours exchange face views and match labels -> ``Edges``
:mod:`.merge`             per-block counts, offsets and the union of matched labels -> ``Merge``
:mod:`.relabel`           every rank writes its blocks with final IDs -> ``Relabelled``
:mod:`.table`             object table and boxes, each rank its own ID range -> ``TableSummary``
:mod:`.finish`            label pyramid, provenance, completion marker, clean-up
========================  ==========================================================

The flow step and the segmentation share their block loop (:mod:`.blockloop`).
Each phase is a function taking and returning frozen values; :func:`mpicellpose.runner.driver.run`
calls them in this order.  Every phase ends in a collective agreement of the MPI gateway
(:class:`mpicellpose.comm.Mailbox`), so an error on one rank stops all of them.
"""
