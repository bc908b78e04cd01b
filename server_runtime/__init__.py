"""The server runtime: the middle decoder blocks, a paged KV pool and a batching engine
behind one websocket endpoint.  It never sees token ids or text, only hidden states."""
