//! Integration tests: one binary, one submodule per area. Every server binds port 0.

mod agent_apis;
mod bad_input;
mod billing_classes;
mod commands;
mod keystore;
mod lago_emulator;
mod litellm_configs;
mod pg_support;
mod pricing_oracle;
mod proxy;
mod reliability_crash;
mod reliability_disk;
mod reliability_outage;
mod reliability_proxy;
mod reliability_support;
mod replicas;
mod security;
mod service;
mod ship_e2e;
mod ship_hostile;
mod ship_ingest;
mod ship_model;
mod ship_sender;
mod ship_stub;
mod support;
mod tail;
