"""Cache methods: shrink the stored KV tensors during a request."""
