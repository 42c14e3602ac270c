"""Volumes on disk: the volume model, opening every supported input lazily, zarr and atomic
files, channels, NGFF metadata and label pyramids, conversion, and the rules that keep a
write from harming the user's files.  No Cellpose; MPI only through :mod:`mpicellpose.comm`
(the collective pyramid and conversion)."""
