"""chunkgate's storage layer: everything below HTTP. Never imports aiohttp or ``gateway``."""
