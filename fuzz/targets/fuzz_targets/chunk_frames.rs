#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| otarig_fuzz_bodies::chunk_frames(data));
