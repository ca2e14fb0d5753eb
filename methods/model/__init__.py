"""Model methods: change attention weights and shapes once, before evaluation."""
