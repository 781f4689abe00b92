"""Standing engine pools: engines that outlive a job, named, found and shared by later jobs
(docs/engine-pools.md)."""
