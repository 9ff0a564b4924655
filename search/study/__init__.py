"""The study and its workers: storage, the shared budget, opening a study, workers, status."""
