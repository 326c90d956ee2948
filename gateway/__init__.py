"""chunkgate's HTTP layer: aiohttp handlers, protocol parsing, metrics export and the CLI."""
