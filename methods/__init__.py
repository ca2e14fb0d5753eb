"""KV-cache reduction methods: one module per method, grouped by what they act on."""
