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
mod reliability;
mod replicas;
mod security;
mod service;
mod ship;
mod support;
mod tail;
