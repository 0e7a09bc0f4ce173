"""After scoring: filter, best-of-N and DPO pairs (`jobs`, on Ray Data, with the row rules in
`selection`), and the one-page HTML report (`report`)."""
