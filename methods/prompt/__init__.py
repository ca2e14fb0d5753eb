"""Prompt methods: shorten the request text before it is tokenised."""
