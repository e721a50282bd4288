"""HTTP transports: the lean HTTP/1.1 client (:mod:`nbkit.http.http1`) and one interface over it,
aiohttp and httpx (:mod:`nbkit.http.transport`). This layer imports nothing else of nbkit."""
