"""Data: records -> examples -> packed batches. Readers, tokenizers, example builders, token
shards, the loader (mixtures, curricula, packing, exact resume) and the built-in tasks."""
