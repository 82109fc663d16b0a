//! What a benchmark reads about a process from `/proc` (Linux).

/// CPU time (utime + stime) of process `pid` (a number, or `self`), in seconds; `None`
/// when `/proc/<pid>/stat` cannot be read or parsed. Clock ticks are taken as 1/100 s,
/// Linux's `USER_HZ`.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; the fields start after the last ')'.
    let rest = text.get(text.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_has_used_some_cpu_and_a_missing_one_none() {
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(super::cpu_seconds("self").is_some_and(|s| s >= 0.0));
        assert_eq!(super::cpu_seconds("999999999"), None);
    }
}
