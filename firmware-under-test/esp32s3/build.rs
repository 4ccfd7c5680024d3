fn main() {
    // ESP-IDF's link settings exist only in an ESP-IDF build; the host type-check has none.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("espidf") {
        embuild::espidf::sysenv::output();
    }
    // The bench's CA (PEM), built in when the firmware server or broker runs TLS:
    // OTARIG_BENCH_CA=/path/to/ca.pem just fw-build. Empty otherwise.
    println!("cargo:rerun-if-env-changed=OTARIG_BENCH_CA");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let ca = match std::env::var("OTARIG_BENCH_CA") {
        Ok(path) => {
            println!("cargo:rerun-if-changed={path}");
            std::fs::read(&path).unwrap_or_else(|e| panic!("OTARIG_BENCH_CA={path}: {e}"))
        }
        Err(_) => Vec::new(),
    };
    std::fs::write(out.join("bench_ca.pem"), ca).expect("writing bench_ca.pem");
}
