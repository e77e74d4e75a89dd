"""The engine: requests, scheduler, KV block manager, sampler, model runner, core loop, client."""
