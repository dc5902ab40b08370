"""FFN rank: its expert shard and slice of the dense/shared FFN, and the serve loop."""
