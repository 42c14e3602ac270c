"""A run: :func:`mpicellpose.runner.driver.run` sequences the phases (:mod:`.phases`) over the
MPI gateway; around them, one block's path from input to record (:mod:`.blocks`), the work
directory, where a run writes and its lock, the object table's files, stop signals, progress,
logging and fault injection for the tests.

(Called ``runner``, not ``run``: ``mpicellpose.run`` is the public function
:func:`mpicellpose.runner.driver.run`, and a subpackage of that name would replace it as an
attribute of the package once imported.)
"""
