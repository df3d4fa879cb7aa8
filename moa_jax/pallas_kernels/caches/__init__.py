"""The KV caches the decode kernels read, and `MoASchedule`, the resolved plan of one layer."""
