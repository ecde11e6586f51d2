//! The librdkafka settings every Kafka client of triagem starts from, built in
//! one place for the worker's consumer and producer and for loadgen's clients:
//! the bootstrap servers, then the defaults of the client's role, then the
//! user's settings over them, in the order given (a later one wins).

use rdkafka::config::ClientConfig;

/// `bootstrap.servers = brokers`, then `defaults`, then `overrides` in order.
pub fn client_config<'a>(
    brokers: &str,
    defaults: &[(&str, &str)],
    overrides: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    for (k, v) in overrides {
        c.set(k, v);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_settings_win_over_defaults_and_later_over_earlier() {
        let client = [("linger.ms".to_string(), "1".to_string()), ("client.id".to_string(), "a".to_string())];
        let role = [("client.id".to_string(), "b".to_string())];
        let overrides = client.iter().chain(role.iter()).map(|(k, v)| (k, v));
        let c = client_config("k:9092", &[("linger.ms", "5"), ("acks", "all")], overrides);
        assert_eq!(c.get("bootstrap.servers"), Some("k:9092"));
        assert_eq!(c.get("linger.ms"), Some("1"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("client.id"), Some("b"));
    }
}
