"""Pure text functions, no engine: the FLIP prompts, answer parsing, word metrics and other
similarities, the reward-hacking flags, and the row rules (`RowError`, `InputError`)."""
