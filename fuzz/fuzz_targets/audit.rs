#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| agent_broker_fuzz_targets::audit(data));
