"""What the subcommands other than ``segment`` do: the end-to-end demo on synthetic nuclei, PNG
previews, what a machine offers (``info``), batch scripts for SLURM and LSF, and the dry run
behind ``mpicellpose plan``.  The command line (:mod:`mpicellpose.cli`) parses and prints; the
work is here."""
