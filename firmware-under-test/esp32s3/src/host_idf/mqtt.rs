//! esp-idf-svc 0.52 src/mqtt/client.rs, with embedded-svc 0.29's `mqtt::client` types it
//! re-exports (`EventPayload`, `Details`, `QoS`).

pub mod client {
    use crate::idf::sys::EspError;

    /// embedded-svc: `pub type MessageId = u32;`
    pub type MessageId = u32;

    /// embedded-svc: `pub enum QoS { AtMostOnce, AtLeastOnce, ExactlyOnce }`.
    #[allow(clippy::enum_variant_names)] // upstream's names
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum QoS {
        AtMostOnce,
        AtLeastOnce,
        ExactlyOnce,
    }

    /// embedded-svc: `InitialChunkData { pub total_data_size: usize }`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct InitialChunkData {
        pub total_data_size: usize,
    }

    /// embedded-svc: `SubsequentChunkData { pub current_data_offset: usize,
    /// pub total_data_size: usize }`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SubsequentChunkData {
        pub current_data_offset: usize,
        pub total_data_size: usize,
    }

    /// embedded-svc: how much of a message an `MQTT_EVENT_DATA` carries.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Details {
        Complete,
        InitialChunk(InitialChunkData),
        SubsequentChunk(SubsequentChunkData),
    }

    /// embedded-svc src/mqtt/client.rs: `pub enum EventPayload<'a, E>`.
    pub enum EventPayload<'a, E> {
        BeforeConnect,
        Connected(bool),
        Disconnected,
        Subscribed(MessageId),
        Unsubscribed(MessageId),
        Published(MessageId),
        Received {
            id: MessageId,
            topic: Option<&'a str>,
            data: &'a [u8],
            details: Details,
        },
        Deleted(MessageId),
        Error(&'a E),
    }

    /// src/mqtt/client.rs: `pub struct EspMqttEvent<'a>`.
    pub struct EspMqttEvent<'a>(core::marker::PhantomData<&'a ()>);

    impl EspMqttEvent<'_> {
        /// `pub fn payload(&self) -> EventPayload<'_, EspError>`.
        pub fn payload(&self) -> EventPayload<'_, EspError> {
            crate::idf::host_only()
        }
    }

    /// src/mqtt/client.rs: `pub struct MqttClientConfiguration<'a>` (the fields the shell
    /// sets; Default).
    #[derive(Default)]
    pub struct MqttClientConfiguration<'a> {
        pub client_id: Option<&'a str>,
        pub buffer_size: usize,
        pub out_buffer_size: usize,
        pub use_global_ca_store: bool,
        pub server_certificate: Option<crate::idf::tls::X509<'static>>,
        pub client_certificate: Option<crate::idf::tls::X509<'static>>,
        pub private_key: Option<crate::idf::tls::X509<'static>>,
    }

    pub struct EspMqttClient<'a>(core::marker::PhantomData<&'a ()>);

    impl EspMqttClient<'static> {
        /// `pub fn new_cb<F>(url: &str, conf: &MqttClientConfiguration, callback: F)
        /// -> Result<Self, EspError> where F: for<'b> FnMut(EspMqttEvent<'b>) + Send + 'static`.
        pub fn new_cb<F>(
            _url: &str,
            _conf: &MqttClientConfiguration,
            _callback: F,
        ) -> Result<Self, EspError>
        where
            F: for<'b> FnMut(EspMqttEvent<'b>) + Send + 'static,
        {
            crate::idf::host_only()
        }
    }

    impl EspMqttClient<'_> {
        /// `pub fn subscribe(&mut self, topic: &str, qos: QoS) -> Result<MessageId, EspError>`.
        pub fn subscribe(&mut self, _topic: &str, _qos: QoS) -> Result<MessageId, EspError> {
            crate::idf::host_only()
        }
        /// `pub fn enqueue(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8])
        /// -> Result<MessageId, EspError>`.
        pub fn enqueue(
            &mut self,
            _topic: &str,
            _qos: QoS,
            _retain: bool,
            _payload: &[u8],
        ) -> Result<MessageId, EspError> {
            crate::idf::host_only()
        }
    }
}
