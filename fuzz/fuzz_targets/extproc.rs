#![no_main]
// See infergate_fuzz_harness::extproc for the input format and what must hold.
libfuzzer_sys::fuzz_target!(|data: &[u8]| infergate_fuzz_harness::extproc(data));
