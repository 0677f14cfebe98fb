//! hubspot-files-gateway: the one place internal services ask HubSpot how a file import is going.
#![forbid(unsafe_code)]
pub mod simulator;
