//! lanup-node
