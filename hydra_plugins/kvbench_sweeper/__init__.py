"""kvbench's Hydra sweeper (``hydra/sweeper: kvbench``): see :mod:`.kvbench_sweeper`."""
