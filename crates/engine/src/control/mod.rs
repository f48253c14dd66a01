//! The control plane: runtime config, feature flags, QoS policies, canary
//! rollout, circuit breaker, latency metrics.

pub mod breaker;
pub mod canary;
pub mod config;
pub mod flags;
pub mod metrics;
pub mod qos;
