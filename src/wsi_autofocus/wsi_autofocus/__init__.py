"""Deep-learning autofocus: focus regressor training, evaluation, inference backends and node."""
