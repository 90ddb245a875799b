"""Models, objectives, data loading, trainers, sampling and evaluation."""
