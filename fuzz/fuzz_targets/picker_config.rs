#![no_main]
// See infergate_fuzz_harness::picker_config for the input format and what must hold.
libfuzzer_sys::fuzz_target!(|data: &[u8]| infergate_fuzz_harness::picker_config(data));
