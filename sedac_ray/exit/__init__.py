"""Exit decisions beyond the rule itself: the per-model default policy store and learned probes."""
