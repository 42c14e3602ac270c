"""Synthetic data with exact ground truth: fluorescence nuclei (:mod:`.nuclei`), two-channel
cells (:mod:`.cells`), label helpers (:mod:`.labels`), and the metrics that compare label
volumes (:mod:`.metrics`: label equivalence, object matching).  Used by the demo, the tests,
the benchmarks and the training of the shipped models; never by a run."""
