"""The vLLM side: the engine, prompt and sampling specs; generation with prompts fitted to the window;
the likelihood rewards' prefills (`flip_logprob`, its lexical control, forward PMI); the judges' prompts
and verdict parsing; the embedded model. vLLM is imported inside functions only."""
