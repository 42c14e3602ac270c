"""The code that trained every shipped model (``mpicellpose/models``), each with its
``python -m`` entry point: the Cellpose 3 nuclei demo model (:mod:`.nuclei`,
``python -m mpicellpose.training``), the two-channel model (:mod:`.two_channel`) and the
Cellpose 4 stand-in (:mod:`.cp4`, data in :mod:`.cp4_data`).  A run never imports this package:
what it needs of the shipped models is :mod:`mpicellpose.cellpose.shipped`."""
