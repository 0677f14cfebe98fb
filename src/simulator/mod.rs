//! The HubSpot stand-in.
