"""The typed configs: the scoring job's (`base`: load, merge, check) and the filter, pairs and
evaluate jobs' (`jobs`). Each reward checks its own `reward.*` keys (`flip_ray.rewards`)."""
