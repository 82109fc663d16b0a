//! Prints the calibration report of every built-in profile (`infergate sim --calibrate` prints one).
fn main() {
    for p in infergate_sim::profile::all() {
        let cfg = infergate_sim::EngineConfig::for_profile(p);
        println!("{}", infergate_sim::calibrate::report(p, &cfg));
    }
}
