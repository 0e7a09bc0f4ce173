"""Evaluating reward methods on preference data: the input (`pairs_input`), the run (`run`: one
scoring pass per reward, the per-pair judges, the baselines), statistics (`stats`) and the plot."""
