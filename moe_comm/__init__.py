"""moe_comm: expert-parallel token dispatch and combine for Mixture-of-Experts models."""
