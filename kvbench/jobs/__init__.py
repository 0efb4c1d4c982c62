"""Jobs: an experiment config planned into jobs, run by a local or a Ray executor, into the store."""
